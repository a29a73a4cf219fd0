#!/usr/bin/env python3
"""Reads an events topic with Confluent's own clients: confluent-kafka's Consumer and the Schema
Registry JSON Schema deserializer (SchemaRegistryClient + JSONDeserializer, which fetches each
writer schema by the id in the Confluent wire format and validates the value against it).

Prints one JSON object per message on stdout: {"partition", "offset", "key", "envelope"}.
Exit status: 0 when --count messages were read, 1 otherwise (a deserializer failure included).
"""

import argparse
import json
import os
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--registry", required=True, help="Confluent-compatible base URL")
    parser.add_argument("--count", type=int, required=True, help="messages to read")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args()

    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"bank-es-interop-{os.getpid()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    metadata = consumer.list_topics(args.topic, timeout=10)
    topic = metadata.topics.get(args.topic)
    if topic is None or topic.error is not None or not topic.partitions:
        print(f"topic {args.topic} not found", file=sys.stderr)
        return 1
    consumer.assign(
        [TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in sorted(topic.partitions)]
    )
    deserialize = JSONDeserializer(
        None, schema_registry_client=SchemaRegistryClient({"url": args.registry})
    )
    read = 0
    deadline = time.monotonic() + args.timeout
    while read < args.count and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            print(f"consumer error: {msg.error()}", file=sys.stderr)
            continue
        context = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
        envelope = deserialize(msg.value(), context)
        key = msg.key().decode("utf-8", "replace") if msg.key() is not None else None
        print(
            json.dumps(
                {
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "key": key,
                    "envelope": envelope,
                }
            ),
            flush=True,
        )
        read += 1
    consumer.close()
    if read < args.count:
        print(f"read {read} of {args.count} messages in {args.timeout}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

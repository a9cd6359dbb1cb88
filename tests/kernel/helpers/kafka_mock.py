"""A Kafka 'broker' for the tests: librdkafka's mock cluster (test.mock.num.brokers), in its own process.

Prints the bootstrap servers (HOST:PORT, as the cluster's metadata reports them) on one line, then
serves until killed. argv[1]: partitions of auto-created topics (the mock default is 4).
The cluster lives in memory: a restarted one is empty.
"""

import confluent_kafka

conf = {"test.mock.num.brokers": 1, "log_level": 3}
client = confluent_kafka.Producer(conf)
brokers = client.list_topics(timeout=10).brokers.values()
print(",".join(f"{b.host}:{b.port}" for b in brokers), flush=True)
while True:
    client.poll(1.0)

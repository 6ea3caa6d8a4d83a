"""The private Mosquitto for tests lives in the product's harness (the demo and the benchmarks use it too);
these names stay importable from here for the test modules that use them."""

from plcsense.harness import Broker, find_executable, free_port, mosquitto_available, start_broker

__all__ = ["Broker", "find_executable", "free_port", "mosquitto_available", "start_broker"]

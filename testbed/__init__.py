"""The system as local processes, for the tests, the benchmark and the fault suite."""

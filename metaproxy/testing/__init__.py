"""Local STS/S3 emulator (moto) and a fault-injection proxy for tests, demo and benchmarks."""

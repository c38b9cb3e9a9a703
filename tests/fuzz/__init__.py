"""Property-based and fuzz tests: schemathesis over every operation, Hypothesis over command bodies."""

"""Support for sfbatch's tests and benchmarks (shipped so both import it the same way)."""

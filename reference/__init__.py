"""NumPy (float64) references that the Pallas kernels are property-tested against."""

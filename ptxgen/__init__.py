"""ptxgen: a pure-Python PTX generator whose kernels are identified by their full spec."""
__version__ = "0.1.0"

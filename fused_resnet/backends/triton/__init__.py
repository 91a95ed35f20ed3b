"""The Triton backend (being built): see the kernels' modules."""

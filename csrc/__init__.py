"""Native kernels (C++/OpenMP and CUDA) and the code that builds them on first use (`csrc.build`)."""

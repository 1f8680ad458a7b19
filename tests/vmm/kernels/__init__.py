"""Small multiboot kernels, built from C and assembly with gcc when a test needs them."""

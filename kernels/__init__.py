"""tqc kernels: Triton kernels and their code generator."""

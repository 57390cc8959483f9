"""gpuload inside PyTorch jobs: ranks from a process group, DTensor loading.

Importing this package does not import torch; its functions do, when called.
"""

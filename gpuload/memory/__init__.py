"""Host memory that the read, host and cuda stages share: file mappings,
page-aligned buffers, the result-mapping pool and pinning (mlock or CUDA
host registration). Below the readers, so every stage can fill or pin it.
"""

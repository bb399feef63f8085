"""One package per op: ``kernels/<op>/{__init__,reference,triton,aiter,...}.py``.

An op package's ``__init__`` registers the op and its kernels without importing any
optional library; kernel modules that need one are named by "module:attr" strings."""

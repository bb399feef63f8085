"""The vLLM hook points kernmux replaces, one module per kernmux op.

Each hook module defines :class:`~kernmux.integrations.vllm_hooks.base.HookSpec`
values (which vLLM function, what its signature must look like, how to build the
replacement); :mod:`kernmux.integrations.vllm` picks the specs for the installed vLLM
version from its table and installs them. Importing this package never imports vLLM
or torch.
"""

"""A third-party op written the way a user would: reference + spec + one kernel in its own
package, made known to kernmux only through the ``kernmux.kernels`` entry point in the
``kmx_fixture_op-1.0.dist-info`` beside it. tests/test_new_op_fixture.py puts this folder
on the path and checks the op is registered, listed, explained, verified and tuned with no
edit anywhere else."""

from __future__ import annotations


def register() -> None:
    """Entry point: register the op from its spec module, then its kernel."""
    from kernmux.dispatch.registry import register_kernel, register_op

    from kmx_fixture_op import spec

    register_op(spec)
    register_kernel(
        op=spec.OP_NAME,
        name="fused",
        impl="kmx_fixture_op.kernel:scaled_add",
        config_space={"chunk": (256, 4096)},
        default_config={"chunk": 4096},
        priority=10,
        doc="chunked in-place-free fused multiply-add",
    )

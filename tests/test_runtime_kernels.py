"""Precompiled inductor kernels: one kernel per static signature, exact for every row count, eager outside the rules."""

from __future__ import annotations

import torch

from test_runtime import close, inputs, packed_w1a8
from xtc_lightning.export import load_packed
from xtc_lightning.inference import kernels, load_runtime
from xtc_lightning.inference.kernels import SERIAL_ROWS, Precompiled, signature
from xtc_lightning.inference.linear import _COMPILED, epilogue, epilogue_codes
from xtc_lightning.quant.int8 import quantize_per_token


def equal(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return (a is None and b is None) or torch.equal(a, b)


def test_one_kernel_serves_every_row_count_and_each_signature_gets_its_own(monkeypatch):
    kernel = Precompiled(quantize_per_token)
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(kernels, "SERIAL_ROWS", 0)  # one thread count for every row count here
    with torch.inference_mode():
        for rows in (2, 1, 17, 300):  # rows are symbolic: compiled once, exact at 1 row too
            x = torch.randn(rows, 24, generator=g) * 10
            assert equal(kernel(x, 127), quantize_per_token(x, 127))
        assert len(kernel.kernels) == 1
        x = torch.randn(5, 24, generator=g)
        # another non-tensor value, width or dtype: another kernel, never one built for other inputs
        assert equal(kernel(x, 7), quantize_per_token(x, 7))
        assert equal(kernel(x[:, :16].contiguous(), 127), quantize_per_token(x[:, :16], 127))
        assert equal(kernel(x.double(), 127), quantize_per_token(x.double(), 127))
        assert len(kernel.kernels) == 4
        # outside the rules (non-contiguous, no rows): the eager function, no kernel built
        t = torch.randn(24, 5, generator=g).t()
        assert signature((t, 127)) is None and equal(kernel(t, 127), quantize_per_token(t, 127))
        assert signature((torch.randn(0, 24), 127)) is None
        assert len(kernel.kernels) == 4


def test_thread_count_is_part_of_the_signature_and_few_rows_use_the_one_thread_kernel():
    x, few = torch.randn(SERIAL_ROWS + 1, 8), torch.randn(SERIAL_ROWS, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, few_one = signature((x, 127)), signature((few, 127))
        torch.set_num_threads(2)
        assert signature((x, 127)) != one  # inductor's CPU kernels are compiled for one thread count
        assert signature((few, 127)) == few_one  # few rows: the serial kernel at any thread count
        kernel = Precompiled(quantize_per_token)
        with torch.inference_mode():
            assert equal(kernel(few, 127), quantize_per_token(few, 127))
            assert equal(kernel(x, 127), quantize_per_token(x, 127))
        assert len(kernel.kernels) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_epilogue_kernels_equal_the_compiled_functions_outputs_with_none_kept(monkeypatch):
    g = torch.Generator().manual_seed(1)
    monkeypatch.setattr(kernels, "SERIAL_ROWS", 0)  # one thread count for every row count here
    n = 24
    bias, nw, nb = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    gelu_codes = Precompiled(epilogue_codes, {"realize_opcount_threshold": 10})
    norm = Precompiled(epilogue)
    with torch.inference_mode():
        for rows in (3, 1, 40):
            y, a = torch.randn(rows, n, generator=g) * 30, torch.rand(rows, 1, generator=g)
            res = torch.randn(rows, n, generator=g)
            z, codes, scale = gelu_codes(y, None, a, bias, True, None, None, 127, False)
            assert z is None  # the GELU output is not returned: only the next linear's codes
            _, codes_ref, scale_ref = epilogue_codes(y, None, a, bias, True, None, None, 127, False)
            # codes are integers of the same fp32 values up to the last bit: at most one step apart
            assert (codes.int() - codes_ref.int()).abs().max() <= 1
            torch.testing.assert_close(scale, scale_ref)
            out = norm(y, None, a, bias, False, res, (nw, nb, 1e-12))
            torch.testing.assert_close(out, epilogue(y, None, a, bias, False, res, (nw, nb, 1e-12)))
        assert len(gelu_codes.kernels) == 1 and len(norm.kernels) == 1


def test_compiled_runtime_after_warm_up_follows_new_shapes(tmp_path, monkeypatch):
    outside = []  # calls that ran eagerly (outside the kernels' rules): none in a runtime forward
    signature_of = kernels.signature
    monkeypatch.setattr(kernels, "signature", lambda args: signature_of(args) or outside.append(args))
    path = packed_w1a8(tmp_path)
    reference, fast = load_packed(path), load_runtime(path)
    one_token = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread count: one kernel per signature
    try:
        with torch.inference_mode():
            fast(**inputs(4, 12, 0))  # warm-up: the kernels of this model's signatures
            built = {n: len(k.kernels) for n, k in _COMPILED.items() if hasattr(k, "kernels")}
            for x in (inputs(1, 2, 1), one_token, inputs(7, 33, 3), inputs(2, 50, 4), inputs(16, 5, 5)):
                out, ref = fast(**x).logits, reference(**x).logits
                close(out, ref)
                assert torch.equal(out.argmax(-1), ref.argmax(-1))
            # new batch sizes and lengths (one token included) ran on the warmed-up kernels
            assert {n: len(k.kernels) for n, k in _COMPILED.items() if hasattr(k, "kernels")} == built
        assert not outside  # LayerNorm weights are parameters (requires_grad): still the kernels
    finally:
        torch.set_num_threads(before)


def test_kernels_are_compiled_for_their_width_and_split_rows_over_the_threads():
    import re

    from torch._inductor.utils import run_and_get_code

    # traced with 2 example rows and every size left symbolic, the kernels shared one cached build
    # (one threading decision) across widths, and the 384-wide ones ran on one thread at any count
    x = torch.randn(SERIAL_ROWS + 1, 40, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            out, code = run_and_get_code(Precompiled(quantize_per_token), x, 127)
    finally:
        torch.set_num_threads(before)
    assert equal(out, quantize_per_token(x, 127))
    source = "\n".join(code)
    assert re.search(r"assert_size_stride\(\w+, \(\w+, 40\), \(40, 1\)", source)  # width static, rows not
    assert "#pragma omp parallel" in source  # the rows are split over the threads


def test_a_kernel_returning_a_view_of_its_input_still_returns_a_view():
    """The inner inductor call skips the wrappers that rebuild aliased outputs: such kernels keep them."""

    def view_and_double(x):
        return x.view(x.shape), x * 2

    kernel = Precompiled(view_and_double)
    with torch.inference_mode():
        x = torch.randn(5, 8)
        view, double = kernel(x)
        assert torch.equal(double, x * 2) and torch.equal(view, x)
        x.add_(1)
        assert torch.equal(view, x)  # still a view of x, as the eager function's

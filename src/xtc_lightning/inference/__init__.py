"""Low-bit CPU inference: a packed file as a fast model, every optimization in its own file.

    linear.py   ``Int8Linear``: int8 activations x weight codes through an integer GEMM (oneDNN
                prepacked, per-row scale in the GEMM's epilogue, else ``torch._int_mm``), then one
                compiled epilogue: scales and bias, the folded GELU, residual add + LayerNorm, and
                the next linear's int8 input codes (``fold_quantize``)
    kernels.py  ``Precompiled``: the epilogues and the quantizer as inductor kernels compiled once per
                static signature and called without dynamo (no guard checks per call)
    unpad.py    padding removal: the encoder runs over the real tokens only (``UnpaddedForward``)
    qkv.py      QKV fusion: linears of one parent reading the same input as one GEMM (``FusedSiblings``)
    bitrows.py  weight codes kept bit-packed, row by row: the word embeddings (``BitRowsEmbedding``)
                and, with ``low_memory``, the linears' codes
    load.py     ``optimize_for_inference`` (all of the above, in place), ``load_runtime`` (a packed
                file through it), ``runtime_bytes`` (the memory a loaded model holds)

The integer codes are those of the fake-quant model; layers it cannot run exactly (groups
that split a row, asymmetric activations, 8-bit asymmetric weights, unquantized weights, an
uncalibrated static range, ``quant_enabled = False``) keep their exact fp32 dequantized forward.

Typical use::

    model = load_runtime("out/model.safetensors")   # load_packed + optimize_for_inference
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
"""

from xtc_lightning.inference.linear import Int8Linear, Int8ResidualNorm, int8_weight
from xtc_lightning.inference.load import load_runtime, optimize_for_inference, runtime_bytes

__all__ = [
    "Int8Linear",
    "Int8ResidualNorm",
    "int8_weight",
    "load_runtime",
    "optimize_for_inference",
    "runtime_bytes",
]

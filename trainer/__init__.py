"""The headless trainer. Never imports ComfyUI."""

import logging

# Import-time notices from optional quantisation backends (pulled in by peft/diffusers) that say
# nothing a user can act on: torchao's pytree registrations, bitsandbytes' missing CPU kernels package,
# diffusers' torchao checkpoint note, torch's "no CUDA runtime". Real errors still come through.
for _name in (
    "torch.utils._pytree",
    "torch.utils.cpp_extension",
    "bitsandbytes",
    "diffusers.quantizers.torchao.torchao_quantizer",
):
    logging.getLogger(_name).setLevel(logging.ERROR)

from . import quiet  # noqa: E402

quiet.install()  # issue 14: per-load third-party noise never reaches the console or ComfyUI's log

"""The memory plan: what a run will hold on the device and in host RAM, per phase, before loading.

`activations.py` measures what the backward pass keeps (fake tensors: full-size shapes, no memory),
`weights.py` sizes frozen weights from file headers or a meta-built model, `estimate.py` adds them
up per phase, `advice.py` says what to change when it does not fit, `presets.py` picks settings for
a card size, `offload.py` applies diffusers' group offloading to the frozen transformer.
"""

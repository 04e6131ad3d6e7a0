"""Print every registered family's tiny component ids (seed 0) as one JSON line: {family: [vae_id,
text_encoder_id]}. Run as `python -m child.model_ids` from tests/.

A child process because that is the claim under test: a fresh interpreter (its own string-hash seed,
object addresses, RNG state and import order) must compute the same cache keys as the test process,
so ids can only depend on weights, configs and vocabularies."""

from __future__ import annotations

import json

from tunegraph.trainer.models import FAMILIES, ModelSource


def main() -> None:
    ids = {}
    for name, family in FAMILIES.items():
        model = family.load(ModelSource(flavour="tiny", seed=0))
        ids[name] = [model.vae_id, model.text_encoder_id]
    print(json.dumps(ids))


if __name__ == "__main__":
    main()

"""GPU benchmark harness: our real training step against a plain diffusers + LyCORIS step.

Modules: cases (grid, sizes, MFU), build (random models, synthetic batch), ours / plain (the two
steps), timing, runner (`run_bench`), table (markdown, device commands), command (the CLI)."""

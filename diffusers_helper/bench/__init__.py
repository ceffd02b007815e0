"""The benchmarks: `bench` (one section, full-size architectures on random weights) and `bench-long`
(cost per section and peak RAM against the video's length).

`weights` writes the random-weight models, `memory` samples the process's memory, `fresh` runs a
measurement in a fresh Python process; `section` and `long_video` are the two subcommands, each
with `add_arguments(parser)` and `run(args) -> int`. Importing this package does no work.
"""

"""Applications built on the compiler: the demo, THC on brain networks (`apps/thc`), and the
shared helpers of long-running commands (progress lines, side-by-side timing). Above
`compiler/`, below `bench/` and `cli/`."""

"""FX passes, one per file, each a `GraphPass` (name, `run(gm, ctx) -> PassResult`, `uuid()`):
`inline_mha` → `canonicalize` → `lower` (rewrites registered per config type in `lowerings/`)
→ `sequence_parallel`. Imports the data layer (`clusterfx.config`) and `clusterfx.ops`, never
the compiler."""

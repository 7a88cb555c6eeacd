"""Reading FX graphs: node tests, the attention-spelling walks, einsum layouts and the static
evaluation of mask subgraphs. No pass of its own; the passes build on it."""

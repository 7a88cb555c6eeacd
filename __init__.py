"""clusterfx: rewrite dense attention into clustered attention with torch.compile passes."""

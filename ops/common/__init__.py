"""Helpers every op family shares: argument checks, implementation dispatch, telemetry, and
(for the Triton implementations only) launch support. Imports only torch (and triton in
`triton_support`)."""

"""Private mode: stateless computation, no privileged access, non-targetability and verifiable
transparency (DESIGN.md, principle 7)."""

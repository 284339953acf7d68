"""Stage 2: the interleaved decoder (see issue 3)."""

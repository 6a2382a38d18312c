"""Analysis: metrics comparing reconstructions with their originals."""

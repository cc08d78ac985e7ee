"""Graph passes: each a function (gm, ctx) -> gm over an aot_autograd ATen graph."""

"""Early warning: signals that move before a loss spike, their findings, and StableAdamW's update clipping.

``signals`` is the pure core (tensors in, numbers out), ``rules`` turns the numbers into
one finding per episode, ``plugin`` measures them inside the Watch's step. See
docs/precursors.md.
"""

"""Text for calibration, training and evaluation: the general-English corpus built from Debian
packages (corpus) and tokenized blocks from any source (blocks).

Layer 1: may import flextron.io.
"""

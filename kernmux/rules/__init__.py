"""kernmux.rules"""

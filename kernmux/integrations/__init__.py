"""kernmux.integrations"""

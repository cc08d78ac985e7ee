"""fsmoe_compiler.moe"""

"""fsmoe_compiler.sim"""

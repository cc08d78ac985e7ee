"""fsmoe_compiler.report"""

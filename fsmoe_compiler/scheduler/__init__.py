"""fsmoe_compiler.scheduler"""

"""Integrations of Dense Connector models with other tools (serving engines, evaluation harnesses), one module per
tool. They build on the package's public classes and the hooks those classes carry; modeling and processing do not
import them.
"""

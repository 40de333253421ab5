"""Adapter kinds. Each kind is one module of pure numpy functions (shapes, initialisation,
export) that both sides share; trainers that need a framework live in ``edgetune.trainers``."""

"""The extra commands of ``python -m cyb_lightning`` (each a ``main(argv)``), above the library they use."""

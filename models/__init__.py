"""Models trained by jaxlaunch."""

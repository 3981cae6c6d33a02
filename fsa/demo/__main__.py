"""``python -m fsa.demo``: start the demo (as ``python app.py`` does; that one also sets OMP_WAIT_POLICY
before torch loads and imports ZeroGPU's ``spaces`` first, which only a file run before ``fsa`` can do)."""
from .page import main

if __name__ == "__main__":
    main()

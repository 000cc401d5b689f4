from qwenstack.cli import app

app(prog_name="qwenstack")

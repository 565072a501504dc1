"""tools/uv_args.py: the set-up hands pip's package sources to uv with pip's precedence."""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("uv_args", Path(__file__).parents[1] / "tools" / "uv_args.py")
uv_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_args)


def test_env_variables_win_over_install_and_global_sections():
    out = "\n".join([
        ":env:.find-links='/from/env'",
        "global.find-links='/from/global'",
        "global.index-url='https://global.example/simple'",
        "install.index-url='https://install.example/simple'",
        "global.timeout='60'",
    ])
    values = uv_args.parse_pip_config(out)
    assert values["find-links"] == "/from/env"
    assert values["index-url"] == "https://install.example/simple"


def test_pip_sources_become_uv_options_with_pips_best_version_strategy():
    values = uv_args.parse_pip_config("\n".join([
        "global.extra-index-url='file:///a/simple file:///b/simple'",
        "global.constraint='/etc/c.txt'",
        "global.cert='/etc/ssl/certs/ca.crt'",
    ]))
    args = uv_args.uv_args(values)
    assert args[:4] == ["--extra-index-url", "file:///a/simple", "--extra-index-url", "file:///b/simple"]
    assert ["--constraints", "/etc/c.txt"] == args[4:6]
    assert args[args.index("--index-strategy") + 1] == "unsafe-best-match"
    assert "--system-certs" in args


def test_no_pip_configuration_means_plain_pypi():
    assert uv_args.uv_args(uv_args.parse_pip_config("")) == []

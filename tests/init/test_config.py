"""istio-iptables' command line and environment, read as pflag and Istio read them, and the
checks pilotfish adds before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilotfish.init.config import ConfigError, cidr_text, parse_args, parse_cidrs, validate

TEMPLATE = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
            "-d", "15090,15021,15020", "--log_output_level=default:info"]


def test_injection_template_arguments() -> None:
    config, rest = parse_args(TEMPLATE, {})
    validate(config)
    assert rest == []
    assert (config.envoy_port, config.inbound_capture_port, config.proxy_uid) == ("15001", "15006", "1337")
    assert (config.service_cidr, config.service_exclude_cidr, config.inbound_ports) == ("*", "", "*")
    assert config.local_exclude_ports == "15090,15021,15020"


@pytest.mark.parametrize("argv", [
    ["--inbound-capture-port=15007"], ["--inbound-capture-port", "15007"], ["-z15007"], ["-z=15007"], ["-z", "15007"],
])
def test_flag_forms(argv: list[str]) -> None:
    assert parse_args(argv, {})[0].inbound_capture_port == "15007"


def test_booleans_bare_or_with_value() -> None:
    assert parse_args(["--redirect-dns"], {})[0].redirect_dns
    assert not parse_args(["--redirect-dns=false"], {})[0].redirect_dns
    assert parse_args(["-n"], {})[0].dry_run


def test_precedence_default_env_extra_env_flag() -> None:
    assert parse_args([], {})[0].redirect_dns is False
    assert parse_args([], {"REDIRECT_DNS": "true"})[0].redirect_dns
    assert parse_args([], {"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"})[0].redirect_dns is False
    assert parse_args(["--redirect-dns=true"], {"ISTIO_META_DNS_CAPTURE": "false"})[0].redirect_dns
    assert parse_args([], {"ISTIO_INBOUND_PORTS": "8080"})[0].inbound_ports == "8080"
    assert parse_args(["-b", "9090"], {"ISTIO_INBOUND_PORTS": "8080"})[0].inbound_ports == "9090"
    env_only = parse_args([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202", "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"})[0]
    assert (env_only.owner_groups_include, env_only.ipv4_loopback_cidr) == ("java,202", "127.0.0.1/8")


def test_envoy_port_has_no_environment_variable() -> None:
    assert parse_args([], {"ENVOY_PORT": "1"})[0].envoy_port == "15001"


def test_clean_is_a_positional_word() -> None:
    assert parse_args(["clean", "-p", "15001"], {})[1] == ["clean"]


@pytest.mark.parametrize("argv,env,message", [
    (["-z", "70000"], {}, "-z/--inbound-capture-port: invalid port (1-65535): '70000'"),
    (["-p", "0"], {}, "-p/--envoy-port: invalid port"),
    (["-b", "80,x"], {}, "-b/--istio-inbound-ports: invalid port or range (1-65535): 'x'"),
    (["-i", "10.0.0.0/33"], {}, "-i/--istio-service-cidr: invalid CIDR '10.0.0.0/33'"),
    (["-i", "10.0.0.1"], {}, "-i/--istio-service-cidr: invalid CIDR '10.0.0.1' (want address/bits)"),
    (["-x", "*"], {}, "-x/--istio-service-exclude-cidr: '*' is not allowed"),
    (["-m", "tproxy"], {}, "unknown mode 'tproxy', want REDIRECT or TPROXY (TPROXY is case-sensitive"),
    (["-m", "NONE"], {}, "unknown mode 'NONE'"),
    (["-t", "0x539"], {}, "-t/--istio-inbound-tproxy-mark: want a decimal number, got '0x539'"),
    (["-c", "a b"], {}, "-c/--istio-exclude-interfaces: invalid interface name 'a b'"),
    (["--bogus"], {}, "unknown flag --bogus"),
    (["-z"], {}, "flag -z needs a value"),
    (["--redirect-dns=yes"], {}, "--redirect-dns: invalid boolean 'yes'"),
    ([], {"ISTIO_META_DNS_CAPTURE": "yes"}, "ISTIO_META_DNS_CAPTURE: invalid boolean 'yes'"),
    ([], {"PROBE_TIMEOUT": "5"}, "PROBE_TIMEOUT: invalid duration '5'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.1/32"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: want an IPv4 loopback"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(i) for i in range(65))}, "at most 64 groups"),
    (["--iptables-backend", "iptables"], {}, "--iptables-backend: want legacy, nft or auto"),
    ([], {"FORCE_IPTABLES_BINARY": "xtables"}, "--force-iptables-binary: want legacy or nft"),
    (["--ipv6", "maybe"], {}, "--ipv6: want auto, on or off"),
    (["--cleanup-only", "--reconcile"], {}, "--cleanup-only and --reconcile cannot be combined"),
])
def test_bad_input_names_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config, _ = parse_args(argv, env)
        validate(config)
    assert message in str(err.value)


def test_cidrs_keep_host_bits_and_print_like_go() -> None:
    cidrs = parse_cidrs("10.1.2.3/8,2001:DB8::5/32,::ffff:1.2.3.4/128", "-i")
    assert [cidr_text(c) for c in cidrs] == ["10.1.2.3/8", "2001:db8::5/32", "::ffff:1.2.3.4/128"]
    assert [c.version for c in cidrs] == [4, 6, 6]
    assert parse_cidrs("*", "-i") is None and parse_cidrs("", "-i") == []


@pytest.mark.parametrize("flag,env", [("-b", "ISTIO_INBOUND_PORTS"), ("-d", "ISTIO_LOCAL_EXCLUDE_PORTS"),
                                      ("-q", "ISTIO_OUTBOUND_PORTS"), ("-o", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE")])
def test_reversed_port_range_names_the_flag_or_variable(flag: str, env: str) -> None:
    """iptables refuses `--dport 80:70` only in the middle of the apply, naming no flag."""
    extra = ["-b", "*"] if flag == "-d" else []
    for argv, environ, named in ((extra + [flag, "80,80:70"], {}, flag + "/--"), (extra, {env: "80:70"}, env)):
        with pytest.raises(ConfigError) as err:
            validate(parse_args(argv, environ)[0])
        assert named in str(err.value) and "reversed port range '80:70'" in str(err.value)
    validate(parse_args(extra + [flag, "70:80,80:80"], {})[0])


BAD_INTERFACES = {
    "!eth0": "a leading '!' would negate the match",
    'a"b': "the character '\"' is not allowed",
    "a'b": "the character \"'\" is not allowed",
    "a b": "the character ' ' is not allowed",
    "a\tb": "the character '\\t' is not allowed",
    "ab\\c": "the character '\\\\' is not allowed",
    "eth0/1": "the character '/' is not allowed",
    "eth0:1": "the character ':' is not allowed",
    "ethé": "the character 'é' is not allowed",
    "abcdefghijklmnop": "16 bytes long, the kernel allows at most 15",
    "abcdefghijklmno+": "16 bytes long",
    ".": "'.' and '..' are not interface names",
    "..": "'.' and '..' are not interface names",
    "+": "no name before the '+' wildcard",
    "a+b": "'+' is only allowed at the end",
}


@pytest.mark.parametrize("name", list(BAD_INTERFACES))
@pytest.mark.parametrize("flag,env", [("-c", "ISTIO_EXCLUDE_INTERFACES"), ("-k", "KUBE_VIRT_INTERFACES")])
def test_interface_names_checked_as_the_kernel_and_iptables_read_them(name: str, flag: str, env: str) -> None:
    for argv, environ, named in (([flag, f"eth0,{name}"], {}, flag + "/--"), ([], {env: name}, env + ":")):
        with pytest.raises(ConfigError) as err:
            validate(parse_args(argv, environ)[0])
        assert named in str(err.value) and repr(name) in str(err.value), str(err.value)
        assert BAD_INTERFACES[name] in str(err.value)


@pytest.mark.parametrize("name", ["eth0", "abcdefghijklmno", "abcdefghijklmn+", "veth+", "a.b", "br-1_x", "a!b"])
def test_good_interface_names(name: str) -> None:
    validate(parse_args(["-c", name, "-k", name], {})[0])


def test_dry_run_file_is_written_whole_with_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """DRY_RUN_FILE_PATH gets what --dry-run prints, written atomically (common/atomic.py):
    a temp file beside it, fsynced and renamed, so a reader never sees half a plan."""
    from pilotfish.init import command

    out = tmp_path / "plan" / "rules.txt"
    code = command.main(["-p", "15001", "-u", "1337", "--dry-run", "--ipv6=off"],
                        {"DRY_RUN_FILE_PATH": str(out)})
    assert code == 0
    printed = capsys.readouterr().out
    assert "ISTIO_OUTPUT" in printed and out.read_text() == printed
    assert [p.name for p in out.parent.iterdir()] == ["rules.txt"]

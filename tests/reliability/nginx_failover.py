"""nginx in front of AgentPRM servers on 127.0.0.1, for the failover and scale tests.

`Nginx(ports)` writes a config into a private folder and runs nginx in the foreground as a single
process (`master_process off`, so it needs no root and no user switching), proxying one local port to
the given upstream ports round robin. nginx passes a request to the next upstream when it cannot connect
(and on a 503 for idempotent requests); a POST that an upstream dropped mid-request comes back as 502,
which the SDK retries.

`Nginx(ports, affinity=True)` runs the shipped docker/nginx/agentprm.conf instead (X-Episode-ID consistent
hashing, least_conn without it), its replica address replaced by the local ports. Both add an
`X-Upstream` response header naming the replica that answered, so a test can see where a request went.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.conftest import REPO, free_port

SHIPPED_AFFINITY = REPO / "docker" / "nginx" / "agentprm.conf"

CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{site}
}}
"""

ROUND_ROBIN = """
    upstream agentprm {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 8m;
        location / {{
            proxy_pass http://agentprm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-ID $request_id;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 2s;
            proxy_read_timeout 120s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
"""


def affinity_site(upstream_ports: list[int], port: int) -> str:
    """The shipped affinity config with its replicas on local ports. Debian's nginx (1.22) predates the
    `resolve` server parameter (1.27.3), so that and the resolver line are dropped: addresses are fixed here."""
    text = SHIPPED_AFFINITY.read_text()
    server = re.compile(r"^(\s*)server agentprm:8000 resolve (.*);$", re.M)
    if len(server.findall(text)) != 2 or text.count("listen 8000;") != 1:
        raise ValueError(f"{SHIPPED_AFFINITY}: expected two upstream server lines and one listen 8000")
    text = server.sub(lambda m: "\n".join(f"{m[1]}server 127.0.0.1:{p} {m[2]};" for p in upstream_ports), text)
    text = re.sub(r"^resolver .*;$", "", text, flags=re.M)
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    return text.replace("proxy_pass http://$agentprm_upstream;",
                        "proxy_pass http://$agentprm_upstream;\n        add_header X-Upstream $upstream_addr always;")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


class Nginx:
    def __init__(self, upstream_ports: list[int], affinity: bool = False):
        self.binary = nginx_binary()
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install -y nginx)")
        self.dir = Path(tempfile.mkdtemp(prefix="agentprm-nginx-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if affinity:
            site = affinity_site(upstream_ports, self.port)
        else:
            servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=30s;" for p in upstream_ports)
            site = ROUND_ROBIN.format(servers=servers, port=self.port)
        (self.dir / "nginx.conf").write_text(CONFIG.format(dir=self.dir, site=site))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Nginx":
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.errors()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx did not answer: {self.errors()[-2000:]}")
            time.sleep(0.1)

    def errors(self) -> str:
        log = self.dir / "error.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

import pathlib

from setuptools import find_packages, setup

setup(
    name="flask-sse-run",
    version="0.1.0",
    description="Serve plain Python generators as Server-Sent Events endpoints from Flask.",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The file goes into the wheel's dist-info/licenses and the sdist (setuptools >= 77).
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    # The library only: example_app, wsgi.py and gunicorn.conf.py run from a checkout (gunicorn
    # puts its working directory on sys.path), and must not land in users' site-packages.
    packages=find_packages(include=["flask_sse_run", "flask_sse_run.*"]),
    package_data={"flask_sse_run": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "flask>=3.0",
        "pydantic>=2.6",
        "gunicorn>=23",
        "gevent>=24.2",
        # gunicorn's gevent worker imports packaging at run time; without it the worker
        # class fails to load ("class uri 'gevent' invalid").
        "packaging>=23",
        # Bearer auth (SSE_RUN_JWT_KEY). 2.13 fixed algorithm-confusion and crit-header holes.
        "PyJWT>=2.13",
    ],
    extras_require={
        # torch first: `pip install torch==2.13.0` before this extra takes the local CPU wheel.
        # accelerate: device_map="auto" (a model spread over the GPUs).
        "llm": ["torch>=2.1", "transformers>=5", "tokenizers>=0.20", "accelerate>=1.0"],
        # The Redis run store (SSE_RUN_REDIS_URL): runs shared by workers and replicas. hiredis:
        # redis-py's C parser (docs/benchmarks.md: the worker's CPU per event through Redis).
        "redis": ["redis>=5", "hiredis>=3.2"],
        # flask_sse_run.relay's open_stream and the LLM upstream service (FALCON_UPSTREAM); no
        # torch. urllib3 2.3 has read1: what has arrived, not a full buffer (latency per event).
        "relay": ["requests>=2.32", "urllib3>=2.3"],
        # Prometheus metrics (SSE_RUN_METRICS).
        "metrics": ["prometheus-client>=0.20"],
        # flask_sse_run.tracing: a stream's span ends with the stream (the app adds
        # opentelemetry-instrumentation-flask, which brings this too).
        "tracing": ["opentelemetry-api>=1.30"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # tests/test_packaging.py builds the sdist and the wheel as an index would.
            "build>=1.2",
            "hypothesis>=6.100",
            "requests>=2.31",
            "openapi-spec-validator>=0.7",
            "openapi-schema-validator>=0.6",
            "schemathesis>=4.30",
            # RS256 tokens in the auth tests (PyJWT needs it for every public-key algorithm).
            "cryptography>=42",
            # The Redis run store's tests (against a real redis-server that .ci/run installs).
            "redis>=5",
            "hiredis>=3.2",
            # The metrics' tests (gunicorn's multiprocess mode), and the tracing tests: a stream's
            # span with the real SDK and its in-memory exporter.
            "prometheus-client>=0.20",
            "opentelemetry-sdk>=1.30",
            "opentelemetry-instrumentation-flask>=0.51b0",
            # The example page's browser test: drives Debian's chromium through its chromedriver
            # (apt-get install chromium chromium-driver; nothing is downloaded).
            "selenium>=4.11",
            # docs/clients.md's examples, run against gunicorn by tests/test_docs.py: the SSE
            # client libraries people use, each cut mid-stream.
            "requests-sse>=0.5",
            "httpx-sse>=0.4",
            "aiohttp-sse-client>=0.2",
            # CORS tests: flask-cors as users add it, unchanged (the extension has no CORS code).
            "flask-cors>=4",
            # The relay tests' real upstream: `transformers serve` (FastAPI, uvicorn, openai).
            # 5.24 is the version whose /v1/completions stream was tested; its torch>=2.6 is
            # met by the torch==2.13.0 installed first.
            "transformers[serving]>=5.24",
            "urllib3>=2.3",
            # The OpenAI routes' live tests: the clients people use, against gunicorn. 3.50: the
            # SDK whose stream parsing (ids, keep-alive comments, event names) the wire format
            # was measured against.
            "openai>=3.50",
            "langchain-openai>=1.7",
        ],
        # transformers[serving]: bench_llm.py's reference server, `transformers serve`.
        "dev": [
            "ruff>=0.6",
            "mypy>=1.10",
            "types-requests",
            "transformers[serving]>=5.24",
            # The documentation site (docs/), built by .ci/run with warnings as errors.
            "sphinx>=7",
            "myst-parser>=3",
        ],
    },
    classifiers=[
        "Framework :: Flask",
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)

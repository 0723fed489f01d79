//! `vmrun login` and `vmrun logout`: registry credentials in docker's
//! `config.json` (`$DOCKER_CONFIG`, default `~/.docker`), shared with
//! docker and kept where it keeps them (`auths`, or the credential helper
//! `credsStore`/`credHelpers` name; [`vmrun_images::auth`]); and the
//! lookup that pulls make with them. A password is never printed or
//! logged.

use std::io::{IsTerminal, Read, Write};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use vmrun_images::auth::{server_key, AuthError, DockerConfig, Saved};
use vmrun_images::{Credentials, PullOptions};

/// The longest password (or token) read from standard input.
const MAX_PASSWORD: u64 = 64 << 10;

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The user name (asked for on a terminal if not given).
    #[arg(short, long)]
    username: Option<String>,
    /// Read the password (or access token) from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// The registry (`host[:port]`; default Docker Hub).
    server: Option<String>,
}

#[derive(Args, Debug)]
pub struct LogoutArgs {
    /// The registry (`host[:port]`; default Docker Hub).
    server: Option<String>,
}

/// The registry a `login`/`logout` argument names.
fn registry(server: Option<&str>) -> Result<String> {
    Ok(vmrun_images::parse_registry(server.unwrap_or(vmrun_images::DEFAULT_REGISTRY))?)
}

/// `vmrun login [-u USER] [--password-stdin] [REGISTRY]`: asks the registry
/// whether the credentials work, then saves them.
pub fn login(args: LoginArgs) -> Result<i32> {
    let registry = registry(args.server.as_deref())?;
    let stdin = std::io::stdin();
    let username = match args.username {
        Some(u) => u,
        None if args.password_stdin => bail!("--password-stdin needs --username"),
        None if stdin.is_terminal() => {
            eprint!("Username: ");
            std::io::stderr().flush()?;
            let mut line = String::new();
            stdin.read_line(&mut line).context("cannot read the user name")?;
            line.trim().to_owned()
        }
        None => bail!("no user name: give --username (standard input is not a terminal)"),
    };
    if username.is_empty() {
        bail!("the user name is empty");
    }
    let password = if args.password_stdin {
        let mut bytes = Vec::new();
        stdin.lock().take(MAX_PASSWORD + 1).read_to_end(&mut bytes).context("cannot read the password from standard input")?;
        if bytes.len() as u64 > MAX_PASSWORD {
            bail!("the password on standard input is longer than 64 KiB");
        }
        let text = String::from_utf8(bytes).map_err(|_| anyhow!("the password on standard input is not UTF-8"))?;
        text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_owned()
    } else if stdin.is_terminal() {
        rpassword::prompt_password("Password: ").context("cannot read the password")?
    } else {
        bail!("no password: give it on standard input with --password-stdin (standard input is not a terminal)");
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    let credentials = Credentials::new(username, password);
    let mut options = PullOptions::from_env()?;
    options.credentials = Some(credentials.clone());
    log::debug!("checking the credentials of {} with registry {registry}", credentials.username);
    vmrun_images::login(&registry, &options).with_context(|| format!("cannot log in to {registry}"))?;
    let mut config = DockerConfig::load_default()?;
    match config.store(&registry, &credentials).with_context(|| format!("cannot save the credentials for {registry}"))? {
        Saved::Helper(helper) => log::debug!("saved the credentials for {registry} in docker-credential-{helper}"),
        Saved::File(path) => eprintln!(
            "vmrun: the password is saved unencrypted in {}; a credential helper keeps it safer \
             (https://docs.docker.com/go/credential-store/)",
            path.display()
        ),
    }
    println!("Login Succeeded");
    Ok(0)
}

/// `vmrun logout [REGISTRY]`: forgets the registry's credentials (in the
/// file and in its credential helper).
pub fn logout(args: LogoutArgs) -> Result<i32> {
    let registry = registry(args.server.as_deref())?;
    let mut config = DockerConfig::load_default()?;
    let key = server_key(&registry);
    if config.erase(&registry).with_context(|| format!("cannot remove the credentials for {registry}"))? {
        println!("Removing login credentials for {key}");
    } else {
        println!("Not logged in to {key}");
    }
    Ok(0)
}

/// The credentials kept for `registry`, for a pull. A config or helper
/// that cannot be read is warned about and the pull goes on without.
pub fn credentials_for(registry: &str) -> Option<Credentials> {
    let found = DockerConfig::load_default().and_then(|c| Ok((c.credentials(registry)?, c)));
    match found {
        Ok((Some(c), config)) => {
            log::debug!("pulling from {registry} with the credentials of {} ({})", c.username, config.path().display());
            Some(c)
        }
        Ok((None, _)) | Err(AuthError::NoConfigDir) => None,
        Err(e) => {
            log::warn!("cannot read the credentials for {registry}: {e}; pulling without");
            None
        }
    }
}

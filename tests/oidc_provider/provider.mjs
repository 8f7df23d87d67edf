// A real OpenID Connect provider (oidc-provider 9) on loopback, for the node's sign-in tests (tests/oidc.py).
//
//   node provider.mjs CONFIG.json
//
// CONFIG.json:
//   {
//     "port": 0,                            // 0: any free port (the issuer names the one taken)
//     "clients": [{"client_id", "client_secret", "redirect_uris", "token_endpoint_auth_method"}],
//     "accounts": {"alice": {"roles": ["viewer"], "name": "Alice Viewer"}},
//     "roles_claim": "roles",               // the claim that carries an account's roles
//     "audience": "http://127.0.0.1/api",   // the resource server (RFC 8707) that JWT access tokens are for
//     "access_token_ttl": 300,              // seconds
//     "granted_resource": true,             // code flow without `resource`: a JWT for the audience (see below)
//     "jwks": {"keys": [<private RSA JWK, alg RS256>]}
//   }
//
// Prints `listening <issuer>` once it serves requests; exits on SIGTERM or SIGINT.
//
// Choices, made for a relying party such as Authlib's client (scope "openid profile roles", PKCE S256):
// - Scopes: `openid` -> sub, `profile` -> name and preferred_username, `roles` -> the roles claim.
// - conformIdTokenClaims false: the ID token carries every claim of the granted scopes (roles included) even where
//   the access token is good at the userinfo endpoint (oidc-provider would then leave it `sub` only); userinfo
//   returns the same claims.
// - PKCE is required of every client (oidc-provider 9 knows only S256).
// - Access tokens for the audience are JWTs (RFC 9068, header typ at+jwt, RS256, the provider's key), with the
//   roles claim and preferred_username added by extraTokenClaims. The audience is every client's default resource,
//   and with granted_resource a code exchanged without a `resource` parameter still yields that JWT: a client that
//   knows nothing of resource indicators gets a bearer token for the API. Such a token has an `aud` and so is not
//   good at the userinfo endpoint; granted_resource false gives such clients an opaque token for userinfo instead.
// - Consent is never asked: loadExistingGrant grants whatever a configured client requests. Sign-in is the
//   built-in development form (devInteractions: any password); a login that names no configured account is
//   answered with error=access_denied at the client's redirect URI.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const rolesClaim = config.roles_claim ?? 'roles';
const accounts = new Map(Object.entries(config.accounts));
const scope = 'openid profile roles';

// findAccount: only configured accounts exist, so a login with any other name cannot complete.
async function findAccount(ctx, id) {
  const account = accounts.get(id);
  if (!account) return undefined;
  return {
    accountId: id,
    // oidc-provider keeps those claims that the granted scopes (the `claims` mapping below) ask for.
    async claims() {
      return { sub: id, name: account.name ?? id, preferred_username: id, [rolesClaim]: account.roles ?? [] };
    },
  };
}

// loadExistingGrant: the session's grant for this client, or a new one, extended with what this request asks for,
// so that the consent prompt never shows and a browser sign-in is: client -> login form -> client.
async function loadExistingGrant(ctx) {
  const { oidc } = ctx;
  const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
  const grant = (grantId && (await oidc.provider.Grant.find(grantId)))
    || new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
  grant.addOIDCScope([...oidc.requestParamOIDCScopes].join(' '));
  grant.addOIDCClaims([...oidc.requestParamClaims]);
  for (const [indicator, resourceServer] of Object.entries(oidc.resourceServers)) {
    grant.addResourceScope(indicator, [...resourceServer.scopes].join(' '));
  }
  await grant.save();
  return grant;
}

// The listening socket comes first: the issuer names its port, and the provider needs the issuer.
const server = createServer();
await new Promise((resolve) => server.listen(config.port ?? 0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: config.clients.map((client) => ({
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...client,
  })),
  jwks: config.jwks,
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  findAccount,
  loadExistingGrant,
  scopes: ['openid', 'offline_access', 'profile', 'roles'],
  claims: { openid: ['sub'], profile: ['name', 'preferred_username'], roles: [rolesClaim] },
  conformIdTokenClaims: false,
  responseTypes: ['code'],
  pkce: { required: () => true },
  ttl: { AccessToken: config.access_token_ttl ?? 300 },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => oneOf ?? config.audience,
      useGrantedResource: async () => config.granted_resource ?? true,
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        if (resourceIndicator !== config.audience) throw new Provider.errors.InvalidTarget();
        return { scope, audience: config.audience, accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } } };
      },
    },
  },
  extraTokenClaims: async (ctx, token) => {
    const account = accounts.get(token.accountId);
    if (token.kind !== 'AccessToken' || !token.resourceServer || !account) return undefined;
    return { preferred_username: token.accountId, [rolesClaim]: account.roles ?? [] };
  },
});

// The development login form accepts any login; one that names no account is refused here, before the form's own
// handler would finish the interaction with it (the provider would then only show the login form again).
provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
    const body = new URLSearchParams(await readBody(ctx.req));
    if (body.get('prompt') === 'login' && !accounts.has(body.get('login'))) {
      const error = { error: 'access_denied', error_description: 'unknown user' };
      ctx.redirect(await provider.interactionResult(ctx.req, ctx.res, error, { mergeWithLastSubmission: false }));
      ctx.status = 303;
      return;
    }
    ctx.req.body = Object.fromEntries(body);
  }
  await next();
});

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

server.on('request', provider.callback());
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
console.log(`listening ${issuer}`);

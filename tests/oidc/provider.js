// The OpenID Provider tests/control_oidc.rs signs in at: the certified
// `oidc-provider` package with its development login pages (any password),
// a static client for the control server, and a handful of users across
// two companies, two gmail.com addresses and one unverified address.
//
// usage: node provider.js PORT CLIENT_SECRET REDIRECT_URI...
// Prints "listening ISSUER" once it accepts connections.
import Provider from 'oidc-provider';

const [port, secret, ...redirects] = process.argv.slice(2);
if (!port || !secret || redirects.length === 0) {
  console.error('usage: node provider.js PORT CLIENT_SECRET REDIRECT_URI...');
  process.exit(2);
}

const users = {
  alice: { email: 'alice@acme.com', email_verified: true, hd: 'acme.com', groups: ['eng'] },
  bob: { email: 'bob@acme.com', email_verified: true, hd: 'acme.com', groups: ['ops'] },
  carol: { email: 'carol@globex.com', email_verified: true, groups: ['eng'] },
  dave: { email: 'dave@gmail.com', email_verified: true },
  erin: { email: 'erin@gmail.com', email_verified: true },
  mallory: { email: 'mallory@acme.com', email_verified: false, hd: 'acme.com' },
};

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: 'runewarp',
    client_secret: secret,
    redirect_uris: redirects,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  pkce: { methods: ['S256'], required: () => true },
  // Scope-requested claims go into the ID token too (the control server
  // reads only the ID token).
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub', 'hd'],
    email: ['email', 'email_verified'],
    profile: ['name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['runewarp-test-cookie-key'] },
  async findAccount(ctx, id) {
    const user = users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, name: id, ...user };
      },
    };
  },
});
provider.proxy = false;

provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
